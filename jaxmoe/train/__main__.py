"""`python -m jaxmoe.train [--config configs/tiny.yaml] [--flag value ...]`"""
import os
import sys


def _skip_closed_loop_noise() -> None:
    """After a save fails, orbax closes its event loop and tensorstore's late completions each report a
    'RuntimeError: Event loop is closed' traceback as unraisable; the save error itself is reported once."""
    def noise(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    hook, unraisable = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda typ, value, tb: None if noise(value) else hook(typ, value, tb)
    sys.unraisablehook = lambda u: None if noise(u.exc_value) else unraisable(u)


def _report(e: BaseException) -> None:
    import jax

    # Every process of a multi-host job reaches the same error; say which one is speaking.
    who = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.distributed.is_initialized() else ""
    print(f"{who}error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    from jaxmoe.train.args import parse_args

    # Every jaxmoe input error is a ValueError subclass; a NaN abort and a failed save are one line too.
    try:
        t = parse_args(argv)  # before the trainer's imports (jax, orbax, transformers): --help answers at once
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxmoe.train.checkpoint import SaveError
    from jaxmoe.train.loop import run

    try:
        run(t)
    except (ValueError, FileNotFoundError, FloatingPointError, SaveError) as e:
        _report(e)
        if isinstance(e, SaveError):
            # orbax's writer threads still hold the failed save; skipping the interpreter shutdown skips their
            # asyncio tracebacks, so this line stays the last word.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0


if __name__ == "__main__":
    _skip_closed_loop_noise()
    sys.exit(main())
