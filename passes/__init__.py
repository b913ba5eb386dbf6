"""Graph passes over torch.export programs (ExportedProgram -> PassResult)."""
