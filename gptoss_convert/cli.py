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
]


def common_options(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@main.command("dequantize")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True, help="e.g. 5GB, 500MiB")
@common_options
@_run
def dequantize_cmd(src, out, dtype, max_shard_size, overwrite, resume, workers, no_progress):
    """MXFP4 safetensors SRC (directory or hub id) -> HF BF16 checkpoint OUT."""
    from gptoss_convert.converters.dequantize import dequantize
    dequantize(src, out, dtype=dtype, max_shard_size=max_shard_size, workers=workers,
               overwrite=overwrite, resume=resume, progress=not no_progress)


@main.command("to-orbax")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--scanned/--unscanned", default=None, help="Layout: scanned (training) or unscanned (decoding).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the checked plan and exit; writes nothing.")
@common_options
@_run
def to_orbax_cmd(src, out, scanned, dtype, dry_run, overwrite, resume, workers, no_progress):
    """MXFP4 or BF16 SRC (directory or hub id) -> MaxText Orbax checkpoint OUT (OUT/0/items)."""
    if scanned is None:
        raise click.UsageError("choose a layout: --scanned (training) or --unscanned (decoding)")
    from gptoss_convert.converters.to_orbax import to_orbax
    to_orbax(src, out, scanned=scanned, dtype=dtype, dry_run=dry_run, workers=workers,
             overwrite=overwrite, resume=resume, progress=not no_progress)


if __name__ == "__main__":
    main()
