"""The `gptoss-convert` command: a thin shell over the library functions.

Each command maps its options onto one library call; library errors become one line on stderr
and a non-zero exit (a traceback only with --debug).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from gptoss_convert.errors import ConvertError, OutputError
from gptoss_convert.mxfp4.rules import SCALE_RULES


DEBUG_ENV = "GPTOSS_CONVERT_DEBUG"


class _Group(click.Group):
    """The command group: `--debug` is accepted anywhere on the line (also after the command)."""

    def parse_args(self, ctx, args):
        if "--debug" in args[1:]:
            args = ["--debug"] + [a for a in args if a != "--debug"]
        return super().parse_args(ctx, args)


def _debug(ctx) -> bool:
    return bool(ctx.find_root().params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _writable(path: str, what: str) -> Path:
    """Check, before any work, that `path` can be written (its directory exists and is writable)."""
    p = Path(path).absolute()
    if p.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise OutputError(f"{what} {path}: directory {p.parent} does not exist; create it first")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"{what} {path}: cannot write there (read-only or no permission); choose another path")
    return p


def _summary(path: Path | None, command: str, t0: float, code: int, result=None, error: str | None = None) -> None:
    """--json FILE: one schema for every command."""
    if path is None:
        return
    doc = {"command": command, "ok": code == 0, "exit_code": code, "seconds": round(time.perf_counter() - t0, 3),
           "result": None if result is None else (str(result) if isinstance(result, (str, os.PathLike)) else result),
           "error": error}
    path.write_text(json.dumps(doc, indent=1, default=str))


def _run(fn):
    """Turn library errors into `error: ...` + exit code (--debug or GPTOSS_CONVERT_DEBUG=1 keep
    the traceback); usage errors stay click's (exit 2); `--json FILE` gets the summary."""
    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx, *args, **kwargs):
        debug, t0, command = _debug(ctx), time.perf_counter(), ctx.info_name
        summary = kwargs.pop("json_summary", None)
        code, error, result = 0, None, None
        try:
            summary = summary and _writable(summary, "--json")
            result = fn(*args, **kwargs)
            return result
        except click.exceptions.Exit as e:
            code = e.exit_code
            raise
        except click.ClickException:
            code = 2
            raise
        except ConvertError as e:
            if debug:
                raise
            code, error, result = e.exit_code, e.one_line(), e.result
            click.echo(f"error: {error}", err=True)
            sys.exit(code)
        except KeyboardInterrupt:
            code, error = 130, "interrupted"
            resumable = any(p.name == "resume" for p in ctx.command.params)
            advice = "; rerun the same command with --resume to continue" if resumable else ""
            click.echo("interrupted" + advice, err=True)
            sys.exit(code)
        except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
            if debug:
                raise
            msg = " ".join(str(e).split()) or type(e).__name__
            from gptoss_convert.converters.output import disk_full
            if why := disk_full(e):
                code, error = 3, f"cannot write: {why} ({msg}); free space (or raise the file size limit) and rerun"
            else:
                code, error = 1, f"{type(e).__name__}: {msg} (rerun with --debug for a traceback)"
            click.echo(f"error: {error}", err=True)
            sys.exit(code)
        finally:
            if isinstance(summary, Path):
                _summary(summary, command, t0, code, result, error)
    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True,
              help=f"Show Python tracebacks on errors (anywhere on the line; or {DEBUG_ENV}=1).")
@click.version_option(package_name="gptoss-convert")
def main(debug: bool) -> None:
    """Convert gpt-oss checkpoints (MXFP4 safetensors) to HF BF16 and MaxText Orbax, and verify them."""


json_option = click.option("--json", "json_summary", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                           help="Write a machine-readable summary here "
                                "(command, ok, exit_code, seconds, result, error).")


DTYPE = click.Choice(["bf16", "fp32", "bfloat16", "float32"])
_LONG = {"bf16": "bfloat16", "fp32": "float32", "bfloat16": "bfloat16", "float32": "float32"}


def _memory_size(ctx, param, value):
    """--max-memory in bytes; a value that is not a size is a usage error (exit 2)."""
    from gptoss_convert.converters.job import memory_ceiling
    try:
        return memory_ceiling(value)
    except ConvertError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1]) from e


_no_progress = click.option("--no-progress", "--quiet", "no_progress", is_flag=True,
                            help="No progress bar or progress lines.")

_common = [
    click.option("--dtype", type=DTYPE, default="bf16", show_default=True,
                 help="Output dtype (bfloat16, float32 also accepted)."),
    click.option("--dry-run", is_flag=True,
                 help="Print the checked plan (and what it needs) and exit; writes nothing."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("--resume", is_flag=True,
                 help="Continue an interrupted run into the same OUT (only from the same source bytes)."),
    click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads (default: all cores)."),
    _no_progress,
    click.option("--allow-nonfinite", is_flag=True, help="Convert even if BF16 weights hold NaN/inf."),
    click.option("--strict-config", is_flag=True,
                 help="Refuse config.json fields this tool does not know "
                      "(default: accept them as inert, with a warning)."),
    click.option("--no-space-check", is_flag=True,
                 help="Write even if OUT's filesystem has less free space than the output needs "
                      "(or this machine less free memory than the plan's peak)."),
    click.option("--max-memory", default="1.5GB", show_default=True, metavar="SIZE", callback=_memory_size,
                 help="Memory ceiling: fewer blocks are held at once to stay under it (e.g. 1GB, 800MiB); "
                      "refused before any work if one block cannot fit."),
]


def _set_s3_endpoint(ctx, param, value):
    """--s3-endpoint is the environment variable TensorStore's s3 spec is built from (io/location.py)."""
    if value:
        import os
        from gptoss_convert.io.location import ENDPOINT_ENV
        os.environ[ENDPOINT_ENV] = value


s3_endpoint_option = click.option(
    "--s3-endpoint", expose_value=False, callback=_set_s3_endpoint, default=None, metavar="URL",
    help="S3-compatible endpoint for s3:// URLs, e.g. http://127.0.0.1:9000 "
         "(default: $GPTOSS_CONVERT_S3_ENDPOINT, else AWS).")


def allow_uncommitted_option(fn):
    """--allow-uncommitted: within the command, every reader of an Orbax checkpoint accepts a step
    without its commit marker (io/orbax_source.allowing_uncommitted)."""
    @functools.wraps(fn)
    def wrapper(*args, allow_uncommitted, **kwargs):
        from gptoss_convert.io.orbax_source import allowing_uncommitted
        with allowing_uncommitted(allow_uncommitted):
            return fn(*args, **kwargs)
    return click.option("--allow-uncommitted", is_flag=True,
                        help="Read an Orbax step without its commit marker (an unfinished save).")(wrapper)


def common_options(fn):
    """The options every converting command takes, handed to `fn` as one dict `opts` (the library's
    keywords) beside `dtype`, `dry_run` and `workers`; plus --json and --s3-endpoint."""
    @functools.wraps(fn)
    def wrapper(*args, overwrite, resume, no_progress, allow_nonfinite, strict_config, no_space_check, max_memory,
                **kwargs):
        opts = dict(overwrite=overwrite, resume=resume, progress=not no_progress, allow_nonfinite=allow_nonfinite,
                    strict_config=strict_config, check_space=not no_space_check, max_memory=max_memory)
        return fn(*args, opts=opts, **kwargs)
    for opt in reversed(_common + [json_option, s3_endpoint_option]):
        wrapper = opt(wrapper)
    return wrapper


_distributed = [
    click.option("--distributed", is_flag=True,
                 help="Be one of several processes (hosts) writing one OUT, on jax.distributed (docs/multihost.md)."),
    click.option("--coordinator-address", default=None,
                 help="HOST:PORT of process 0 (default: detected by JAX on TPU/GKE/SLURM, "
                      "or JAX_COORDINATOR_ADDRESS)."),
    click.option("--num-processes", type=click.IntRange(1), default=None,
                 help="How many processes (implies --distributed)."),
    click.option("--process-id", type=click.IntRange(0), default=None,
                 help="This process's rank, 0-based (implies --distributed)."),
    click.option("--distributed-timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
                 help="Seconds one process waits for the others at one point before giving up."),
    click.option("--heartbeat-timeout", type=click.FloatRange(min=1), default=60, show_default=True,
                 help="Seconds of silence after which another process counts as dead."),
]


def distributed_options(fn):
    """The multi-process options, handed to `fn` as one dict `dist` (the library's keywords)."""
    @functools.wraps(fn)
    def wrapper(*args, distributed, coordinator_address, num_processes, process_id, distributed_timeout,
                heartbeat_timeout, **kwargs):
        given = (coordinator_address, num_processes, process_id)
        dist = dict(distributed=distributed or any(v is not None for v in given),
                    coordinator_address=coordinator_address,
                    num_processes=num_processes, process_id=process_id, distributed_timeout=distributed_timeout,
                    heartbeat_timeout=heartbeat_timeout)
        return fn(*args, dist=dist, **kwargs)
    for opt in reversed(_distributed):
        wrapper = opt(wrapper)
    return wrapper


_like = click.option("--like", default=None, metavar="HF_DIR_OR_ID",
                     help="The HF model (dir or hub id) whose config.json and tokenizer go with SRC "
                          "(needed for MaxText's own checkpoints).")
_step = click.option("--step", type=int, default=None,
                     help="Orbax SRC given as a run root: this step (default: the latest committed).")
_item = click.option("--item", default=None, metavar="NAME",
                     help="Orbax SRC: the step's item holding the params where it holds several "
                          "(default: found from the checkpoint: items, model_params).")
_scale_rule = click.option(
    "--scale-rule", type=click.Choice(SCALE_RULES), default="triton", show_default=True,
    help="MXFP4 rule (docs/finetune.md, 'Which scale rule'): triton_kernels' round-up scale (nothing saturates) with "
         "element ties rounded up (as at gpt-oss's release; vLLM's copy) or to even (triton-rtne); OCP's "
         "floor(log2 amax)-2; or compressed-tensors' (llm-compressor's MXFP4: amax rounded to a power of two "
         "at 0.75, ties to even).")
_shard = click.option("--max-shard-size", default="5GB", show_default=True, help="e.g. 5GB, 500MiB")


@main.command("dequantize")
@click.argument("src")
@click.argument("out")
@_shard
@common_options
@distributed_options
@_run
def dequantize_cmd(src, out, max_shard_size, dtype, dry_run, workers, opts, dist):
    """MXFP4 safetensors SRC (directory or hub id) -> HF BF16 checkpoint OUT (a directory, gs:// or s3://)."""
    from gptoss_convert.converters.dequantize import dequantize
    return dequantize(src, out, dtype=dtype, max_shard_size=max_shard_size, workers=workers, dry_run=dry_run,
                      **opts, **dist)


def _layout(ctx, scanned: bool, unscanned: bool) -> bool:
    if scanned == unscanned:
        raise click.UsageError("choose one layout: --scanned (training) or --unscanned (decoding)"
                               + ("" if not scanned else ", not both"), ctx)
    return scanned


_scanned = click.option("--scanned", is_flag=True, help="Layout for training (layers stacked, scan_layers=true).")
_unscanned = click.option("--unscanned", is_flag=True,
                          help="Layout for decoding (one subtree per layer, scan_layers=false).")
_zstd = click.option("--zstd", is_flag=True, help="Compress chunks with zstd as Orbax does (smaller, slower).")


def _options(*decorators):
    """One decorator applying `decorators` in the order given (the options listed in that order)."""
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return apply


_orbax_layout = _options(_scanned, _unscanned, _zstd)      # what an Orbax OUT is: to-orbax's and merge-lora's
_orbax_source = _options(_like, _step, _item)               # which Orbax SRC: to-orbax's, to-hf's and merge-lora's


@main.command("to-orbax")
@click.argument("src")
@click.argument("out")
@_orbax_layout
@_orbax_source
@common_options
@distributed_options
@allow_uncommitted_option
@_run
def to_orbax_cmd(src, out, scanned, unscanned, zstd, like, step, item, dtype, dry_run, workers, opts, dist):
    """MXFP4 or BF16 SRC (directory or hub id), or an Orbax checkpoint (relayout) -> MaxText Orbax checkpoint OUT
    (OUT/0/items; a directory, gs:// or s3://)."""
    scanned = _layout(click.get_current_context(), scanned, unscanned)
    from gptoss_convert.converters.to_orbax import to_orbax
    return to_orbax(src, out, scanned=scanned, dtype=dtype, dry_run=dry_run, workers=workers,
                    compression="zstd" if zstd else None, like=like, step=step, item=item, **opts, **dist)


@main.command("to-hf")
@click.argument("src")
@click.argument("out")
@click.option("--mxfp4", is_flag=True, help="Requantize the expert weights to MXFP4 in the published layout (gpt-oss).")
@_scale_rule
@_orbax_source
@_shard
@common_options
@distributed_options
@allow_uncommitted_option
@_run
def to_hf_cmd(src, out, mxfp4, scale_rule, like, step, item, max_shard_size, dtype, dry_run, workers, opts, dist):
    """Orbax checkpoint SRC (run root, step or items; ours or MaxText's) -> HF checkpoint OUT (a directory, gs:// or s3://)."""
    from gptoss_convert.converters.to_hf import to_hf
    return to_hf(src, out, mxfp4=mxfp4, scale_rule=scale_rule, like=like, step=step, item=item, dtype=dtype,
                 max_shard_size=max_shard_size, dry_run=dry_run, workers=workers, **opts, **dist)


@main.command("merge-lora")
@click.argument("base")
@click.argument("adapter")
@click.argument("out")
@click.option("--mxfp4", is_flag=True, help="Write the expert weights as MXFP4 in the published layout (gpt-oss).")
@_scale_rule
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the adapter's scaling by this.")
@click.option("--lora-alpha", type=float, default=None,
              help="MaxText LoRA ADAPTER: the run's lora.lora_alpha (MaxText does not record it).")
@click.option("--lora-rank", type=click.IntRange(1), default=None,
              help="MaxText LoRA ADAPTER: the run's lora.lora_rank (checked against the adapters' shapes).")
@click.option("--to-orbax", "to_orbax", is_flag=True,
              help="Write OUT as a MaxText Orbax checkpoint (OUT/0/items, as to-orbax; with --scanned or --unscanned).")
@_orbax_layout
@_orbax_source
@_shard
@common_options
@distributed_options
@allow_uncommitted_option
@_run
def merge_lora_cmd(base, adapter, out, mxfp4, scale_rule, scale, lora_alpha, lora_rank, to_orbax, scanned, unscanned,
                   zstd, like, step, item, max_shard_size, dtype, dry_run, workers, opts, dist):
    """HF checkpoint BASE (MXFP4 or BF16; directory or hub id) + LoRA ADAPTER (a PEFT directory or hub id, or a
    MaxText/Tunix LoRA checkpoint: run root or step) -> merged HF checkpoint OUT (a directory, gs:// or s3://).
    BASE may also be an Orbax checkpoint (--like: its config where MaxText wrote it).
    --step/--item choose within the ADAPTER when it is an Orbax checkpoint, else within an Orbax BASE
    (to pick a base's step too, give BASE as that step's directory). --to-orbax writes the merged model as
    to-orbax writes (--scanned or --unscanned; not --mxfp4)."""
    if to_orbax:
        ctx = click.get_current_context()
        layout = _layout(ctx, scanned, unscanned)
        given = [f"--{n.replace('_', '-')}" for n in ("max_shard_size", "scale_rule")
                 if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if given:                   # they shape HF output only: taken and ignored they would mislead
            raise click.UsageError(f"{' and '.join(given)}: for HF output; --to-orbax writes Orbax chunks "
                                   "(drop them)", ctx)
    else:                           # the library refuses a layout flag without --to-orbax, naming it
        layout = True if scanned else False if unscanned else None
    from gptoss_convert.converters.merge_lora import merge_lora
    return merge_lora(base, adapter, out, mxfp4=mxfp4, scale_rule=scale_rule, scale=scale, dtype=dtype,
                      lora_alpha=lora_alpha, lora_rank=lora_rank, like=like, step=step, item=item,
                      to_orbax=to_orbax, scanned=layout, compression="zstd" if zstd else None,
                      max_shard_size=max_shard_size, dry_run=dry_run, workers=workers, **opts, **dist)


@main.command("golden")
@click.argument("hf_dir")
@click.option("--out", required=True, type=click.Path(), help="Golden file to write (JSON lines).")
@click.option("--prompts", default=None, help="';'-separated prompts (default: MaxText's three + a long passage).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None, help="One prompt per line.")
@click.option("--tokens", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSON list of token-id lists instead of prompts (checkpoints without a tokenizer).")
@click.option("--dtype", type=DTYPE, default="fp32", show_default=True)
@click.option("--streamed/--whole-model", default=None,
              help="transformers' layers one at a time, bounded memory (default: model > half the free memory).")
@_no_progress
@json_option
@_run
def golden_cmd(hf_dir, out, prompts, prompts_file, tokens, dtype, streamed, no_progress):
    """Reference logits from HF transformers on HF_DIR (MXFP4 or BF16), MaxText's golden format."""
    from gptoss_convert.verify.golden import golden
    return golden(hf_dir, out, prompts=prompts, prompts_file=prompts_file, tokens=tokens, dtype=dtype,
                  streamed=streamed, show_progress=not no_progress)


@main.command("verify")
@click.argument("ckpt")
@click.option("--golden", "golden_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--hf", default=None, help="Compute the golden logits now from this HF directory / hub id.")
@click.option("--moe", type=click.Choice(["ragged_dot", "megablox", "dense"]), default="ragged_dot", show_default=True)
@click.option("--atol", type=float, default=0.1, show_default=True)
@click.option("--rtol", type=float, default=0.1, show_default=True)
@click.option("--max-kl", type=float, default=3e-4, show_default=True)
@click.option("--skip-first-token", is_flag=True)
@click.option("--like", "--config", "config", type=click.Path(exists=True, file_okay=False), default=None,
              help="HF directory holding config.json (and tokenizer), if not beside the checkpoint.")
@click.option("--prompts", default=None, help="With --hf: ';'-separated prompts.")
@click.option("--tokens", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --hf: a JSON list of token-id lists instead of prompts (no tokenizer needed).")
@click.option("--streamed/--in-memory", default=None,
              help="Layer by layer, reading only the selected experts; with --hf the golden too (default: by size).")
@_no_progress
@_step
@_item
@s3_endpoint_option
@allow_uncommitted_option
@json_option
@_run
def verify_cmd(ckpt, golden_file, hf, moe, atol, rtol, max_kl, skip_first_token, config, prompts, tokens,
               streamed, no_progress, step, item):
    """Check CKPT (an Orbax output or an HF directory) against golden logits; exit 0 only on PASS.
    --json FILE: the common summary, its `result` the report (per prompt, coverage, phases), FAIL too."""
    from gptoss_convert.verify.verify import verify
    return verify(ckpt, golden=golden_file, hf=hf, moe=moe, atol=atol, rtol=rtol, max_kl=max_kl,
                  skip_first_token=skip_first_token, config=config, prompts=prompts,
                  streamed=streamed, tokens=tokens, show_progress=not no_progress, step=step, item=item)


@main.command("check")
@click.argument("out")
@s3_endpoint_option
@json_option
@allow_uncommitted_option
@_run
def check_cmd(out):
    """Re-read a finished output (safetensors or Orbax) and confirm it against its conversion.json."""
    from gptoss_convert.converters.check import check
    return check(out)


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@_no_progress
@json_option
@_run
def demo_cmd(workdir, no_progress):
    """Generate a tiny gpt-oss and run dequantize, to-orbax (both layouts), golden and verify."""
    from gptoss_convert.demo import demo
    rows = demo(workdir, progress=not no_progress)
    if any(r["verdict"] == "FAIL" for r in rows):
        from gptoss_convert.errors import VerifyFailed
        raise VerifyFailed("demo: a step failed (see the table above)")
    return rows


@main.command("generate")
@click.argument("ckpt")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--like", "--tokenizer", "tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help="HF directory holding config.json and tokenizer.json, if not beside CKPT.")
@click.option("--max-new-tokens", type=click.IntRange(0), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same tokens).")
@click.option("--moe", type=click.Choice(["ragged_dot", "megablox", "dense"]), default="ragged_dot", show_default=True)
@click.option("--dtype", type=DTYPE, default="fp32", show_default=True)
@_step
@_item
@s3_endpoint_option
@json_option
@allow_uncommitted_option
@_run
def generate_cmd(ckpt, prompt, tokenizer, max_new_tokens, temperature, top_p, seed, moe, dtype, step, item):
    """Continue --prompt with CKPT (an Orbax output or an HF directory) using a KV cache."""
    from gptoss_convert.generate import generate_from_checkpoint
    r = generate_from_checkpoint(ckpt, prompt, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, moe=moe, dtype=_LONG[dtype],
                                 step=step, item=item)
    click.echo(r["prompt"] + r["text"])
    click.echo(f"prompt ids: {r['prompt_ids']}")
    click.echo(f"new ids: {r['new_ids']}")
    click.echo(r["stats"].summary(), err=True)
    return {k: r[k] for k in ("prompt_ids", "new_ids", "text")}


if __name__ == "__main__":
    main()
