"""load_checkpoint: config + safetensors -> reference Transformer, strictly and without copies.

The model is built on the meta device (no memory, no random init), every parameter is matched to
exactly one stored tensor (or a slice of a fused one), checked for shape and dtype family, cast
only when the stored dtype differs, and assigned in place; then the non-persistent buffers (rope
tables, zeroed caches) are created on the target device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3_export.checkpoint.errors import CheckpointError
from dsv3_export.checkpoint.hf_config import HfLayout, hf_config_to_args
from dsv3_export.checkpoint.io import WeightFiles, read_json
from dsv3_export.checkpoint.names import Piece, hf_to_ours, layer_of, ours_to_hf, rope_row_permutation
from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.fp8 import FP8_DTYPE
from dsv3_export.reference.model import Transformer

_SHOW = 8  # names listed in one error message


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                    max_seq_len: int | None = None, max_batch_size: int | None = None,
                    attn_impl: str | None = None, moe_impl: str = "loop") -> Transformer:
    """A checkpoint directory (HF or DeepSeek layout) -> Transformer in eval mode on `device`.

    dtype: compute dtype and dtype of every dense weight (fp8 weights stay fp8).
    max_seq_len / max_batch_size / attn_impl: runtime settings (KV cache size, attention form)
    that override the config's; for HF checkpoints max_seq_len defaults to
    min(max_position_embeddings, 16384).
    """
    directory = Path(path)
    args, layout = _read_config(directory, max_seq_len)
    files = WeightFiles(directory)
    runtime = {k: v for k, v in dict(max_batch_size=max_batch_size, attn_impl=attn_impl).items() if v is not None}
    args = args.replace(**runtime)
    with torch.device("meta"):
        model = Transformer(args, dtype=dtype, moe_impl=moe_impl)
    state = _assign(model, files, layout, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    model.materialize_buffers(device)
    return model.eval()


def load_args(path: str | Path, max_seq_len: int | None = None) -> ModelArgs:
    """The ModelArgs of a checkpoint directory, from its config.json alone (no weights read)."""
    return _read_config(Path(path), max_seq_len)[0]


def _read_config(directory: Path, max_seq_len: int | None) -> tuple[ModelArgs, HfLayout | None]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config_path = directory / "config.json"
    config = read_json(config_path)
    if "model_type" in config:
        return hf_config_to_args(config, str(config_path), max_seq_len)
    args = ModelArgs.from_dict(config, source=str(config_path))  # ConfigError on unknown keys
    if max_seq_len is not None:
        args = args.replace(max_seq_len=max_seq_len)
    return args, None


def _sources(files: WeightFiles, args: ModelArgs, layout: HfLayout | None) -> tuple[dict[str, tuple[str, Piece]], list[str]]:
    """our name -> (stored name, piece); and the stored names that map to nothing."""
    sources: dict[str, tuple[str, Piece]] = {}
    unmapped = []
    for stored in files.tensors:
        if layout is None:
            pieces = [Piece(stored)]
        elif args.n_layers <= (layer_of(stored) or 0) < args.n_layers + layout.n_mtp_layers:
            continue  # DeepSeek-V3's multi-token-prediction layer(s) after the last: not part of the causal LM
        else:
            pieces = hf_to_ours(stored, args.n_routed_experts, args.moe_inter_dim, args.dim)
        if pieces is None:
            unmapped.append(stored)
            continue
        for piece in pieces:
            if piece.name in sources:
                raise CheckpointError(f"{files.tensors[stored].file}: {stored} and {sources[piece.name][0]} "
                                      f"both provide {piece.name}")
            sources[piece.name] = (stored, piece)
    if layout is not None and layout.tie_word_embeddings and "head.weight" not in sources and "embed.weight" in sources:
        sources["head.weight"] = sources["embed.weight"]
    return sources, unmapped


def _check_names(model: Transformer, files: WeightFiles, layout: HfLayout | None,
                 sources: dict[str, tuple[str, Piece]], unmapped: list[str]) -> None:
    expected = model.state_dict()
    where = (lambda ours: ours_to_hf(ours)) if layout is not None else (lambda ours: ours)
    problems, dense = [], []
    for name in sorted(set(expected) - set(sources)):
        weight = name[: -len("scale")] + "weight"
        stored = sources[weight][0] if name.endswith(".scale") and weight in sources else None
        if stored is not None and files.tensors[stored].dtype == FP8_DTYPE:
            problems.append(f"fp8 weight {stored} in {files.tensors[stored].file} has no scale {where(name)}")
        else:
            problems.append(f"missing tensor {where(name)}")
            if stored is not None:
                dense.append(stored)
    extra = unmapped + sorted(sources[n][0] for n in set(sources) - set(expected))
    problems += [f"unexpected tensor {s} in {files.tensors[s].file}" for s in sorted(set(extra))]
    if problems:
        hint = ""
        if any(p.endswith(("_scale_inv", ".scale")) for p in extra) and model.args.dtype != "fp8":
            hint = " (the files hold fp8 scales but the config declares no fp8 quantization)"
        elif dense:  # e.g. DeepSeek's fp8_cast_bf16.py output next to the fp8 checkpoint's config.json
            fix = "remove quantization_config from" if layout is not None else 'set "dtype": "bf16" in'
            hint = (f" (the config declares fp8 weights but {dense[0]} is {files.tensors[dense[0]].dtype}; "
                    f"for a dense checkpoint, {fix} config.json)")
        raise CheckpointError(f"{files.directory}: checkpoint does not match its config{hint}: {_listing(problems)}")


def _assign(model: Transformer, files: WeightFiles, layout: HfLayout | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Read, check and cast every tensor the model needs; returns our state dict."""
    args = model.args
    sources, unmapped = _sources(files, args, layout)
    _check_names(model, files, layout, sources, unmapped)
    state = {}
    for name, target in model.state_dict().items():
        stored, piece = sources[name]
        info = files.tensors[stored]
        if piece.whole is not None and info.shape != piece.whole:  # checked before it is sliced
            raise CheckpointError(f"{info.file}: tensor {stored} has shape {list(info.shape)}, expected "
                                  f"{list(piece.whole)} (fused experts; the config's n_routed_experts, "
                                  "moe_intermediate_size and hidden_size)")
        shape = tuple(torch.empty(info.shape, device="meta")[piece.index].shape) if piece.index else info.shape
        what = f"{info.file}: tensor {stored}" + (f" (slice for {name})" if piece.index else "")
        if shape != tuple(target.shape):
            raise CheckpointError(f"{what} has shape {list(shape)}, expected {list(target.shape)}")
        if target.dtype == FP8_DTYPE:
            if info.dtype != FP8_DTYPE:
                raise CheckpointError(f"{what} has dtype {info.dtype}, expected float8_e4m3fn (the config declares fp8)")
        elif not (isinstance(info.dtype, torch.dtype) and info.dtype.is_floating_point and info.dtype.itemsize > 1):
            hint = ""
            if info.dtype == FP8_DTYPE:  # embedding, head, router and norms stay dense in DeepSeek's fp8 scheme
                hint = (" (an fp8 weight, but the config declares no fp8 quantization)" if args.dtype != "fp8" else
                        " (fp8 checkpoints keep the embedding, lm_head, router gate, norms and scales dense)")
            raise CheckpointError(f"{what} has dtype {info.dtype}, expected a float dtype{hint}")
        tensor = files.read(stored, piece.index)
        if layout is not None and not layout.rope_interleave:
            tensor = _interleave_rope_rows(name, tensor, args, what)
        state[name] = tensor.to(device=device, dtype=target.dtype)
    return state


def _interleave_rope_rows(name: str, tensor: torch.Tensor, args: ModelArgs, what: str) -> torch.Tensor:
    perm = rope_row_permutation(name, tensor.shape[0], args.n_heads, args.qk_nope_head_dim,
                                args.qk_rope_head_dim, args.kv_lora_rank)
    if perm is None:
        return tensor
    if tensor.dtype == FP8_DTYPE and not torch.equal(perm // args.block_size, torch.arange(len(perm)) // args.block_size):
        raise CheckpointError(f"{what}: reordering rope rows (rope_interleave=false) would move fp8 rows across "
                              f"{args.block_size}-row scale blocks")
    return tensor[perm]
