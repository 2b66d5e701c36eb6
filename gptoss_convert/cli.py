"""The `gptoss-convert` command: a thin shell over the library functions.

Each command maps its options onto one library call; library errors become one line on stderr
and a non-zero exit (a traceback only with --debug).
"""

from __future__ import annotations

import functools
import sys

import click

from gptoss_convert.errors import ConvertError


def _run(fn):
    """Turn library errors into `error: ...` + exit code; --debug keeps the traceback."""
    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx, *args, **kwargs):
        debug = ctx.find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except ConvertError as e:
            if debug:
                raise
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command with --resume to continue", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
            if debug:
                raise
            msg = " ".join(str(e).split()) or type(e).__name__
            from gptoss_convert.converters.output import disk_full
            if why := disk_full(e):
                click.echo(f"error: cannot write: {why} ({msg}); free space (or raise the file size limit) and rerun", err=True)
                sys.exit(3)
            click.echo(f"error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.version_option(package_name="gptoss-convert")
def main(debug: bool) -> None:
    """Convert gpt-oss checkpoints (MXFP4 safetensors) to HF BF16 and MaxText Orbax, and verify them."""


_common = [
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run into the same OUT."),
    click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads (default: all cores)."),
    click.option("--no-progress", is_flag=True, help="No progress bar."),
    click.option("--allow-nonfinite", is_flag=True, help="Convert even if BF16 weights hold NaN/inf."),
    click.option("--strict-config", is_flag=True,
                 help="Refuse config.json fields this tool does not know (default: accept them as inert, with a warning)."),
]


def _set_s3_endpoint(ctx, param, value):
    """--s3-endpoint is the environment variable TensorStore's s3 spec is built from (io/location.py)."""
    if value:
        import os
        from gptoss_convert.io.location import ENDPOINT_ENV
        os.environ[ENDPOINT_ENV] = value


s3_endpoint_option = click.option(
    "--s3-endpoint", expose_value=False, callback=_set_s3_endpoint, default=None, metavar="URL",
    help="S3-compatible endpoint for s3:// URLs, e.g. http://127.0.0.1:9000 (default: $GPTOSS_CONVERT_S3_ENDPOINT, else AWS).")


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
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


_distributed = [
    click.option("--distributed", is_flag=True,
                 help="Be one of several processes (hosts) writing one OUT, on jax.distributed (docs/multihost.md)."),
    click.option("--coordinator-address", default=None,
                 help="HOST:PORT of process 0 (default: detected by JAX on TPU/GKE/SLURM, or JAX_COORDINATOR_ADDRESS)."),
    click.option("--num-processes", type=click.IntRange(1), default=None, help="How many processes (implies --distributed)."),
    click.option("--process-id", type=click.IntRange(0), default=None, help="This process's rank, 0-based (implies --distributed)."),
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
        dist = dict(distributed=distributed or any(v is not None for v in given), coordinator_address=coordinator_address,
                    num_processes=num_processes, process_id=process_id, distributed_timeout=distributed_timeout,
                    heartbeat_timeout=heartbeat_timeout)
        return fn(*args, dist=dist, **kwargs)
    for opt in reversed(_distributed):
        wrapper = opt(wrapper)
    return wrapper


@main.command("dequantize")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True, help="e.g. 5GB, 500MiB")
@common_options
@distributed_options
@_run
def dequantize_cmd(src, out, dtype, max_shard_size, overwrite, resume, workers, no_progress, allow_nonfinite, strict_config,
                   dist):
    """MXFP4 safetensors SRC (directory or hub id) -> HF BF16 checkpoint OUT."""
    from gptoss_convert.converters.dequantize import dequantize
    dequantize(src, out, dtype=dtype, max_shard_size=max_shard_size, workers=workers,
               overwrite=overwrite, resume=resume, progress=not no_progress, allow_nonfinite=allow_nonfinite,
               strict_config=strict_config, **dist)


@main.command("to-orbax")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--scanned/--unscanned", default=None, help="Layout: scanned (training) or unscanned (decoding).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the checked plan and exit; writes nothing.")
@click.option("--zstd", is_flag=True, help="Compress chunks with zstd as Orbax does (smaller, slower).")
@click.option("--like", default=None, help="Orbax SRC without config.json beside it (MaxText's): the HF model (dir or id) it came from.")
@click.option("--step", type=int, default=None, help="Orbax SRC given as a run root: this step (default: the latest committed).")
@s3_endpoint_option
@common_options
@distributed_options
@allow_uncommitted_option
@_run
def to_orbax_cmd(src, out, scanned, dtype, dry_run, zstd, like, step, overwrite, resume, workers, no_progress,
                 allow_nonfinite, strict_config, dist):
    """MXFP4 or BF16 SRC (directory or hub id), or an Orbax checkpoint (relayout) -> MaxText Orbax checkpoint OUT
    (OUT/0/items; a directory, gs:// or s3://)."""
    if scanned is None:
        raise click.UsageError("choose a layout: --scanned (training) or --unscanned (decoding)")
    from gptoss_convert.converters.to_orbax import to_orbax
    to_orbax(src, out, scanned=scanned, dtype=dtype, dry_run=dry_run, workers=workers, compression="zstd" if zstd else None,
             overwrite=overwrite, resume=resume, progress=not no_progress, allow_nonfinite=allow_nonfinite,
             strict_config=strict_config, like=like, step=step, **dist)


@main.command("to-hf")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--mxfp4", is_flag=True, help="Requantize the expert weights to MXFP4 in the published layout (gpt-oss).")
@click.option("--scale-rule", type=click.Choice(["triton", "triton-rtne", "ocp"]), default="triton", show_default=True,
              help="MXFP4 rule: triton_kernels' round-up scale (nothing saturates) with element ties rounded up "
                   "(as at gpt-oss's release; vLLM's copy) or to even (triton-rtne), or OCP's floor(log2 amax)-2.")
@click.option("--like", default=None, help="HF model (dir or id) for config.json and tokenizer (needed for MaxText's own checkpoints).")
@click.option("--step", type=int, default=None, help="SRC given as a run root: this step (default: the latest committed).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True, help="e.g. 5GB, 500MiB")
@click.option("--dry-run", is_flag=True, help="Print the checked plan and exit; writes nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same OUT.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--allow-nonfinite", is_flag=True, help="Export BF16 weights holding NaN/inf (never requantized).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Threads reading and requantizing (default: all cores, at least 4).")
@s3_endpoint_option
@distributed_options
@allow_uncommitted_option
@_run
def to_hf_cmd(src, out, mxfp4, scale_rule, like, step, dtype, max_shard_size, dry_run, overwrite, resume, no_progress,
              allow_nonfinite, workers, dist):
    """Orbax checkpoint SRC (run root, step or items; ours or MaxText's) -> HF checkpoint OUT."""
    from gptoss_convert.converters.to_hf import to_hf
    to_hf(src, out, mxfp4=mxfp4, scale_rule=scale_rule, like=like, step=step, dtype=dtype, max_shard_size=max_shard_size,
          dry_run=dry_run, overwrite=overwrite, resume=resume, progress=not no_progress, allow_nonfinite=allow_nonfinite,
          workers=workers, **dist)


@main.command("golden")
@click.argument("hf_dir")
@click.option("--out", required=True, type=click.Path(), help="Golden file to write (JSON lines).")
@click.option("--prompts", default=None, help="';'-separated prompts (default: MaxText's three + a long passage).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None, help="One prompt per line.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@_run
def golden_cmd(hf_dir, out, prompts, prompts_file, dtype):
    """Reference logits from HF transformers on HF_DIR (MXFP4 or BF16), MaxText's golden format."""
    from gptoss_convert.verify.golden import golden
    golden(hf_dir, out, prompts=prompts, prompts_file=prompts_file, dtype=dtype)


@main.command("verify")
@click.argument("ckpt")
@click.option("--golden", "golden_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--hf", default=None, help="Compute the golden logits now from this HF directory / hub id.")
@click.option("--moe", type=click.Choice(["ragged_dot", "megablox", "dense"]), default="ragged_dot", show_default=True)
@click.option("--atol", type=float, default=0.1, show_default=True)
@click.option("--rtol", type=float, default=0.1, show_default=True)
@click.option("--max-kl", type=float, default=3e-4, show_default=True)
@click.option("--skip-first-token", is_flag=True)
@click.option("--json", "json_report", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--config", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory holding config.json, if not beside the checkpoint.")
@click.option("--prompts", default=None, help="With --hf: ';'-separated prompts.")
@click.option("--streamed/--in-memory", default=None,
              help="Layer by layer, reading only the selected experts (default: streamed above 2 GB).")
@s3_endpoint_option
@allow_uncommitted_option
@_run
def verify_cmd(ckpt, golden_file, hf, moe, atol, rtol, max_kl, skip_first_token, json_report, config, prompts, streamed):
    """Check CKPT (an Orbax output or an HF directory) against golden logits; exit 0 only on PASS."""
    from gptoss_convert.verify.verify import verify
    verify(ckpt, golden=golden_file, hf=hf, moe=moe, atol=atol, rtol=rtol, max_kl=max_kl,
           skip_first_token=skip_first_token, json_report=json_report, config=config, prompts=prompts,
           streamed=streamed)


@main.command("check")
@click.argument("out")
@s3_endpoint_option
@allow_uncommitted_option
@_run
def check_cmd(out):
    """Re-read a finished output (safetensors or Orbax) and confirm it against its conversion.json."""
    from gptoss_convert.converters.check import check
    check(out)


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@_run
def demo_cmd(workdir):
    """Generate a tiny gpt-oss and run dequantize, to-orbax (both layouts), golden and verify."""
    from gptoss_convert.demo import demo
    rows = demo(workdir)
    if any(r["verdict"] == "FAIL" for r in rows):
        sys.exit(4)


@main.command("generate")
@click.argument("ckpt")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory holding tokenizer.json (default: the one holding config.json beside CKPT).")
@click.option("--max-new-tokens", type=click.IntRange(0), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same tokens).")
@click.option("--moe", type=click.Choice(["ragged_dot", "megablox", "dense"]), default="ragged_dot", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@s3_endpoint_option
@allow_uncommitted_option
@_run
def generate_cmd(ckpt, prompt, tokenizer, max_new_tokens, temperature, top_p, seed, moe, dtype):
    """Continue --prompt with CKPT (an Orbax output or an HF directory) using a KV cache."""
    from gptoss_convert.generate import generate_from_checkpoint
    r = generate_from_checkpoint(ckpt, prompt, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, moe=moe, dtype=dtype)
    click.echo(r["prompt"] + r["text"])
    click.echo(f"prompt ids: {r['prompt_ids']}")
    click.echo(f"new ids: {r['new_ids']}")
    click.echo(r["stats"].summary(), err=True)


if __name__ == "__main__":
    main()
