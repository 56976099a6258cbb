"""`python -m jaxmoe.train [--config configs/tiny.yaml] [--flag value ...]`"""
import os
import sys

from jaxmoe.config import ConfigError


def main(argv=None) -> int:
    from jaxmoe.train.args import parse_args
    from jaxmoe.train.checkpoint import SaveError
    from jaxmoe.train.loop import run

    try:
        t = parse_args(argv)
        run(t)
    # Every jaxmoe input error is a ValueError subclass; a NaN abort and a failed save are one line too.
    except (ValueError, FileNotFoundError, FloatingPointError, SaveError) as e:
        import jax

        # Every process of a multi-host job reaches the same error; say which one is speaking.
        who = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.distributed.is_initialized() else ""
        print(f"{who}error: {e}", file=sys.stderr)
        if isinstance(e, SaveError):
            # orbax's writer threads still hold the failed save; skipping the interpreter shutdown skips their
            # asyncio tracebacks, so this line stays the last word.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
