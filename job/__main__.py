import signal

from .cli import cli

if __name__ == "__main__":   # not when a spawned child process (the checkpoint uploader) imports it
    try:
        cli(prog_name="python -m job")
    finally:
        # The command is over and its exit code chosen: a stop signal has nothing left to stop. Ignored from here,
        # one that comes while the interpreter tears down (1-2 s with torch loaded) cannot kill the process: Python
        # puts the default handlers back in its last steps, and a finished run would then exit 143, which
        # Kubernetes and `restart: on-failure` count as a failure. (An ignored signal stays ignored through them.)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
