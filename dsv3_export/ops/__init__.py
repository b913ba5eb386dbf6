"""dsv3-export."""
