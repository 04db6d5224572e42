"""``clipsurgery serve``: an HTTP server over an exported pair, or a Triton repository for fleets
(a thin click layer over surgery.serve). Registered in surgery/cli/main.py with ``main.add_command(serve)``.
"""
from __future__ import annotations

import os
import sys

import click

import surgery.serve as serving
from surgery.cli.errors import user_errors as _user_errors
from surgery.errors import SurgeryError
from surgery.serve.batcher import BatchOptions
from surgery.serve.limits import ServeLimits
from surgery.serve.triton_repo import write_triton_repository


@click.command()
@click.argument("model", metavar="OUT.onnx")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Rows (images or texts) per ONNX Runtime call, from concurrent requests.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long the oldest waiting row waits for others before its batch runs.")
@click.option("--max-queue", type=click.IntRange(1), default=1024, show_default=True,
              help="Rows waiting per tower; a request that does not fit is answered 503 with Retry-After.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Batches run at once per tower (threads sharing one session, each with cores/N ORT threads).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=16.0, show_default=True,
              help="Largest request body (413 above).")
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest image (width x height, read from its header: decompression bombs are refused).")
@click.option("--max-aspect-ratio", type=click.FloatRange(1), default=50.0, show_default=True,
              help="Longest image (long side / short side, from its header): the transform resizes the short side to "
                   "the model's size, so a 1 x 1,000,000 image would become gigabytes.")
@click.option("--max-text-chars", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--max-items", type=click.IntRange(1), default=256, show_default=True,
              help="Images or texts in one request.")
@click.option("--max-decode-pixels", type=click.IntRange(1), default=None,
              help="Image pixels (from the headers) decoded at once over all requests; a request that does not fit "
                   "now gets 503, one that never fits 413; requests over 4 M pixels hold at most 3/4 of it together.  "
                   "[default: 2 x --max-image-pixels]")
@click.option("--max-text-bytes", type=click.IntRange(1), default=6 * 1024 * 1024, show_default=True,
              help="UTF-8 bytes of text tokenized at once over all requests (503 / 413 as above).")
@click.option("--graceful-timeout-s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="After SIGTERM, requests still running this long are answered 503 and the server exits.")
@click.option("--triton-repo", "triton_repo", default=None, type=click.Path(file_okay=False),
              help="Instead of serving: write a Triton Inference Server model repository here (the path for fleets; "
                   "dynamic batching with --max-batch / --max-wait-ms) and exit.")
@click.option("--force", is_flag=True, help="--triton-repo: replace a repository folder that holds files.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@_user_errors
def serve(model, host, port, max_batch, max_wait_ms, max_queue, workers, provider, max_body_mb, max_image_pixels,
          max_aspect_ratio, max_text_chars, max_items, max_decode_pixels, max_text_bytes, graceful_timeout_s,
          triton_repo, force, log_level):
    """Serve OUT.onnx (the pair written by export/debias) over HTTP with dynamic batching.

    POST /v1/embeddings/image (multipart files or JSON {"images": [base64]}), /v1/embeddings/text
    (JSON {"texts": [...]}), /v1/embeddings (OpenAI: {"input": ...}); GET /healthz, /readyz, /metrics
    (Prometheus), /v1/model. SIGTERM drains in-flight requests and exits 0.
    """
    if triton_repo:
        for path in write_triton_repository(model, triton_repo, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                            force=force):
            click.echo(f"wrote {path}")
        return
    try:  # the serve extra is optional (surgery.serve imports its HTTP parts on first use)
        ServeOptions, build_app, run_app = serving.ServeOptions, serving.build_app, serving.run_app
    except ImportError as exc:
        raise SurgeryError(f"clipsurgery serve needs the serve extra (missing: {(exc.name or '?').split('.')[0]}); "
                           "pip install 'clipsurgery[serve]' (from a checkout: pip install -e '.[cpu,serve]')") from None
    options = ServeOptions(host=host, port=port, provider=provider, log_level=log_level,
                           graceful_timeout_s=graceful_timeout_s,
                           batch=BatchOptions(max_batch=max_batch, max_wait_s=max_wait_ms / 1000, max_queue=max_queue,
                                              workers=workers),
                           limits=ServeLimits(max_body_bytes=int(max_body_mb * 1024 * 1024),
                                              max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio,
                                              max_text_chars=max_text_chars, max_items=max_items,
                                              max_decode_pixels=max_decode_pixels, max_text_bytes=max_text_bytes))
    app = build_app(model, options)  # opens and warms up the pair: a bad file is refused before anything listens
    click.echo(f"serving {model} on http://{host}:{port} (GET /readyz answers 200 once it listens)", err=True)
    abandoned = run_app(app, options)
    if abandoned:  # calls cut off at the shutdown deadline still run on daemon threads: do not wait for them
        click.echo(f"stopped at the shutdown deadline ({abandoned} call(s) abandoned)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    click.echo("drained and stopped", err=True)
