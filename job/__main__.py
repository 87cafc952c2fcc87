from .cli import cli

if __name__ == "__main__":   # not when a spawned child process (the checkpoint uploader) imports it
    cli(prog_name="python -m job")
