"""llmforge-hello: an example llmforge plugin.

llmforge imports this module at every start-up, `llmforge --help` included (it is the entry point
named in pyproject.toml), so it imports nothing but llmforge's hook marker. The stage module (pydantic)
is imported inside the registration hook, which runs only when a command needs the stage table; torch
and the like would belong inside ``Stage.run`` or a command's function, where they cost nothing until used.
"""

from llmforge import hookimpl

__version__ = "0.1.0"
__all__ = ["register_stages", "register_commands"]


@hookimpl
def register_stages(register):
    from llmforge_hello.stage import HelloStage

    register(HelloStage)


@hookimpl
def register_commands(cli):
    # typer is imported here, not at the top: llmforge's core must stay importable without any UI
    # library, and this module is imported whenever plugins load, CLI or not.
    from typing import Annotated

    import typer

    # Parameters as Annotated[type, typer.Option(...)] = default, as llmforge's own commands declare them.
    @cli.command("hello")
    def hello(
        name: Annotated[str, typer.Argument(help="Who to greet.")] = "world",
        greeting: Annotated[str, typer.Option("--greeting", "-g", help="The word to greet with.")] = "Hello",
        times: Annotated[int, typer.Option("--times", "-n", min=1, help="How many times.")] = 1,
    ) -> None:
        """Print greetings, exactly as the hello stage would write them."""
        from llmforge_hello.stage import greetings

        for line in greetings(greeting, [name], times):
            typer.echo(line)
