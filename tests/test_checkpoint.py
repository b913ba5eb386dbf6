"""save_checkpoint / load_checkpoint round trips, fp8, preset_model, and refusing bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3_export.checkpoint import CheckpointError, load_checkpoint, preset_model, save_checkpoint
from dsv3_export.reference import ConfigError

LAYOUTS = ["deepseek", "hf"]


def tokens(seed: int, shape=(2, 9), vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (NaN-safe, fp8-safe)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)) for k in a)


def stored(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def rewrite(path, change) -> None:
    """Apply change(dict) to the tensors of the single safetensors file in `path`."""
    (file,) = path.glob("*.safetensors")
    tensors = stored(path)
    change(tensors)
    file.unlink()
    save_file(tensors, str(file))


@pytest.fixture(scope="module")
def tiny():
    return preset_model("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_fp8():
    return preset_model("tiny", seed=1, weight_dtype="fp8")


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_round_trip_gives_identical_logits(tmp_path, tiny, layout):
    save_checkpoint(tiny, tmp_path / "ckpt", layout=layout)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert bitwise_equal(loaded.state_dict(), tiny.state_dict())
    assert loaded.args.softmax_scale == tiny.args.softmax_scale and loaded.args.yarn_enabled
    tiny.reset_cache()
    x = tokens(0)
    assert torch.equal(loaded(x), tiny(x))


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_fp8_round_trip_is_bit_exact(tmp_path, tiny_fp8, layout):
    assert tiny_fp8.layers[0].attn.wkv_a.weight.dtype == torch.float8_e4m3fn
    save_checkpoint(tiny_fp8, tmp_path / "ckpt", layout=layout)
    names = stored(tmp_path / "ckpt").keys()
    scale = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" if layout == "hf" else "layers.0.attn.wkv_a.scale"
    assert scale in names
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.args.dtype == "fp8"
    assert bitwise_equal(loaded.state_dict(), tiny_fp8.state_dict())
    tiny_fp8.reset_cache()
    x = tokens(1)
    assert torch.equal(loaded(x), tiny_fp8(x))


def test_sharded_save_loads(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "ckpt", layout="deepseek", max_shard_bytes=1 << 20)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 2
    assert bitwise_equal(load_checkpoint(tmp_path / "ckpt").state_dict(), tiny.state_dict())


@torch.no_grad()
def test_load_casts_dtype_and_sets_runtime_args(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16, max_batch_size=2, max_seq_len=200, attn_impl="naive")
    assert model.embed.weight.dtype == torch.bfloat16 and model.layers[1].ffn.gate.weight.dtype == torch.bfloat16
    assert model.args.max_batch_size == 2 and model.args.max_seq_len == 200 and model.args.attn_impl == "naive"
    assert model.layers[0].attn.k_cache.shape[:2] == (2, 200) and model.rope_cos.shape[0] == 200
    assert torch.equal(model.embed.weight, tiny.embed.weight.to(torch.bfloat16))
    assert model(tokens(2)).dtype == torch.float32


def test_save_refuses_non_empty_directory(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_checkpoint(tiny, tmp_path / "ckpt")
    other = preset_model("tiny", seed=5)
    save_checkpoint(other, tmp_path / "ckpt", overwrite=True)
    assert bitwise_equal(load_checkpoint(tmp_path / "ckpt").state_dict(), other.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left


# --- preset_model ------------------------------------------------------------------------------

def test_preset_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = preset_model("tiny", seed=7), preset_model("tiny", seed=7), preset_model("tiny", seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert bitwise_equal(a.state_dict(), b.state_dict())
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert not a.training


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture()
def ckpt(tmp_path, tiny):
    return save_checkpoint(tiny, tmp_path / "ckpt")


@pytest.fixture()
def hf_ckpt(tmp_path, tiny_fp8):
    return save_checkpoint(tiny_fp8, tmp_path / "hf", layout="hf")


def test_unknown_config_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_mtp_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown key\(s\) \['n_mtp_layers'\]"):
        load_checkpoint(ckpt)


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("layers.2.ffn.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"ckpt: .*missing tensor layers\.2\.ffn\.experts\.5\.w3\.weight"):
        load_checkpoint(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"layers.0.attn.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.0\.attn\.extra\.weight in .*model0-mp1\.safetensors"):
        load_checkpoint(ckpt)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda t: t.update({"layers.1.attn.wkv_b.weight": torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors: tensor layers\.1\.attn\.wkv_b\.weight "
                                              r"has shape \[5, 64\], expected \[256, 64\]"):
        load_checkpoint(ckpt)


def test_wrong_dtype_family(ckpt):
    rewrite(ckpt, lambda t: t.update({"norm.weight": torch.ones(192, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor norm\.weight has dtype torch\.int32, expected a float dtype"):
        load_checkpoint(ckpt)


def test_fp8_weight_without_scale(hf_ckpt):
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    rewrite(hf_ckpt, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"fp8 weight model\.layers\.1\.self_attn\.o_proj\.weight in "
                                              r".*model\.safetensors has no scale " + name.replace(".", r"\.")):
        load_checkpoint(hf_ckpt)


def test_fp8_weights_without_fp8_config(hf_ckpt):
    cfg = json.loads((hf_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (hf_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config declares no fp8 quantization"):
        load_checkpoint(hf_ckpt)


def _fuse_experts(tensors: dict[str, torch.Tensor], layer: int, n_experts: int) -> None:
    """A layer's per-expert HF tensors -> transformers 5's fused gate_up_proj [E, 2I, D] / down_proj [E, D, I]."""
    prefix = f"model.layers.{layer}.mlp.experts"
    w = {kind: [tensors.pop(f"{prefix}.{e}.{kind}.weight") for e in range(n_experts)]
         for kind in ("gate_proj", "up_proj", "down_proj")}
    tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(w["gate_proj"], w["up_proj"])])
    tensors[f"{prefix}.down_proj"] = torch.stack(w["down_proj"])


@pytest.mark.parametrize("kind,change", [
    ("gate_up_proj", lambda t: t[:-1]),  # one expert fewer than the config's: was a raw IndexError
    ("gate_up_proj", lambda t: torch.cat([t, t[:1]])),  # one more: the extra expert was silently dropped
    ("gate_up_proj", lambda t: torch.cat([t, t[:, :2]], dim=1)),  # 2I + 2 rows: the last two silently dropped
    ("down_proj", lambda t: torch.cat([t, t[:1]])),
    ("down_proj", lambda t: torch.tensor(1.0)),  # 0-d: was a raw IndexError
])
def test_fused_experts_of_the_wrong_shape_are_refused(tmp_path, tiny, kind, change):
    path = save_checkpoint(tiny, tmp_path / "hf", layout="hf")
    fused = f"model.layers.1.mlp.experts.{kind}"

    def fuse_and_change(t):
        _fuse_experts(t, 1, tiny.args.n_routed_experts)
        t[fused] = change(t[fused]).contiguous()

    rewrite(path, fuse_and_change)
    expected = {"gate_up_proj": r"\[8, 192, 192\]", "down_proj": r"\[8, 192, 96\]"}[kind]  # [E, 2I, D], [E, D, I]
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor " + fused.replace(".", r"\.") +
                       r" has shape \[.*\], expected " + expected):
        load_checkpoint(path)


def test_fused_experts_load(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "hf", layout="hf")
    rewrite(path, lambda t: _fuse_experts(t, 1, tiny.args.n_routed_experts))
    assert bitwise_equal(load_checkpoint(path).state_dict(), tiny.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_weights_with_an_fp8_config_say_so(tmp_path, tiny, layout):
    """A dense checkpoint whose config.json still declares fp8 (e.g. DeepSeek's fp8_cast_bf16.py output next to the
    fp8 config): was "fp8 weight ... has no scale" for weights that are not fp8."""
    path = save_checkpoint(tiny, tmp_path / "ckpt", layout=layout)
    cfg = json.loads((path / "config.json").read_text())
    if layout == "hf":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    else:
        cfg["dtype"] = "fp8"
    (path / "config.json").write_text(json.dumps(cfg))
    fix = "remove quantization_config from" if layout == "hf" else 'set "dtype": "bf16" in'
    with pytest.raises(CheckpointError, match=r"the config declares fp8 weights but \S+ is torch\.float32; for a "
                                              rf"dense checkpoint, {fix} config\.json\): missing tensor ") as e:
        load_checkpoint(path)
    assert "has no scale" not in str(e.value)


def test_fp8_embedding_in_an_fp8_checkpoint_is_named_as_such(hf_ckpt):
    """The hint said "the config declares no fp8 quantization" though it does."""
    name = "model.embed_tokens.weight"
    rewrite(hf_ckpt, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight has dtype torch\.float8_e4m3fn, "
                                              r"expected a float dtype \(fp8 checkpoints keep the embedding") as e:
        load_checkpoint(hf_ckpt)
    assert "declares no fp8" not in str(e.value)


def test_only_the_mtp_layers_after_the_last_are_skipped(tmp_path):
    """num_nextn_predict_layers=1 makes layer n_layers the MTP layer; further layers are unexpected, as they are
    without MTP (they were all skipped: a config with fewer layers than the checkpoint loaded a truncated model)."""
    model = preset_model("tiny", score_func="sigmoid", gate_bias=True)
    path = save_checkpoint(model, tmp_path / "hf", layout="hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=1, num_nextn_predict_layers=1)  # stored: layers 0, 1 (the MTP layer) and 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.2\.") as e:
        load_checkpoint(path)
    assert "model.layers.1." not in str(e.value)
    cfg.update(num_hidden_layers=2)  # layer 2 is the MTP layer
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(path).args.n_layers == 2


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, tiny):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(tiny.args.to_dict()))
    torch.save(tiny.state_dict(), directory / "pytorch_model.bin")  # test-only pickle
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle checkpoints are not loaded; convert to safetensors"):
        load_checkpoint(directory)


def test_truncated_safetensors(ckpt):
    file = ckpt / "model0-mp1.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors: not a readable safetensors file.*truncated"):
        load_checkpoint(ckpt)


def test_model_parallel_shards_are_refused(ckpt):
    file = ckpt / "model0-mp1.safetensors"
    file.rename(ckpt / "model0-mp2.safetensors")
    (ckpt / "model1-mp2.safetensors").write_bytes((ckpt / "model0-mp2.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"model0-mp2\.safetensors: model-parallel shard \(mp2\); only mp1"):
        load_checkpoint(ckpt)


def test_index_naming_a_missing_shard(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=1 << 20)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {victim.name}, which does not exist"):
        load_checkpoint(path)


def test_index_naming_a_shard_outside_the_directory(tmp_path, tiny):
    """A weight_map entry is a file name in the checkpoint's directory: "../other/x.safetensors" (another
    checkpoint's file, which exists) is refused, not read."""
    import json

    path = save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=1 << 20)
    other = save_checkpoint(tiny, tmp_path / "other", max_shard_bytes=1 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    assert (other / shard).is_file()
    index["weight_map"][name] = f"../other/{shard}"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map names shard\(s\) \['\.\./other/"):
        load_checkpoint(path)


@pytest.mark.parametrize("shards, shown", [
    ([["model-00001.safetensors"]], r"\[\['model-00001\.safetensors'\]\]"),  # a list: was TypeError: unhashable
    ([5, None], r"\[5, None\]"),  # an int and a null: was TypeError: '<' not supported
    ([""], r"\[''\]"),  # was "lists shard ckpt, which does not exist", naming the directory
])
def test_index_naming_shards_that_are_not_file_names(tmp_path, tiny, shards, shown):
    path = save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=1 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for name, shard in zip(index["weight_map"], shards):
        index["weight_map"][name] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map names shard\(s\) " + shown):
        load_checkpoint(path)


def test_shard_holding_a_tensor_the_index_does_not_list(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=1 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard}: holds {name}, which model\.safetensors\.index\.json "
                                              r"does not list$"):  # was "... maps to None"
        load_checkpoint(path)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_checkpoint(tmp_path)


def test_hf_model_type_must_be_deepseek(hf_ckpt):
    cfg = json.loads((hf_ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='llama'"):
        load_checkpoint(hf_ckpt)


# --- memory ------------------------------------------------------------------------------------

def test_load_does_not_copy_the_checkpoint(tmp_path):
    """Peak RSS growth while loading and running a 226 MiB fp32 checkpoint stays near 1x its size.

    safetensors memory-maps the file and our loader assigns the mapped tensors without copying
    (same dtype): measured 1.25x (weights + first-forward allocations); a copying loader: 2.7x.
    """
    model = preset_model("tiny", vocab_size=150_000, max_seq_len=256, max_batch_size=1)
    path = save_checkpoint(model, tmp_path / "big")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    del model
    script = textwrap.dedent(f"""
        import resource, torch
        from dsv3_export.checkpoint import load_checkpoint
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = load_checkpoint({str(path)!r})
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.6 * size, f"peak RSS grew {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
