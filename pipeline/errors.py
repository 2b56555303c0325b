"""Errors the pipeline raises on purpose, and the stop request a signal becomes. Each maps to an exit
code in ``pipeline.__main__``."""


class InputError(Exception):
    """Bad input from the user (config, paths, adapter/base mismatch). Exit code 2."""


class VerificationError(Exception):
    """An artefact failed its verification; nothing was published. Exit code 3."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGINT, SIGTERM, SIGHUP): exit code 128 + its number.

    A ``KeyboardInterrupt`` so that ``except Exception`` never swallows it and every cleanup that
    handles Ctrl-C (temporary folders, the stage record) handles it too.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signame}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
