"""llmforge-hello: an example llmforge plugin.

llmforge imports this module at every start-up (it is the entry point named in pyproject.toml), so
it stays light: pydantic and llmforge's own API only. Heavy libraries, torch above all, belong
inside ``Stage.run`` or inside a command's function, where they cost nothing until used.
"""

from llmforge import hookimpl

from llmforge_hello.stage import HelloOptions, HelloStage, greetings

__version__ = "0.1.0"
__all__ = ["HelloOptions", "HelloStage", "greetings", "register_stages", "register_commands"]


@hookimpl
def register_stages(register):
    register(HelloStage)


@hookimpl
def register_commands(cli):
    # typer is imported here, not at the top: llmforge's core must stay importable without any UI
    # library, and this module is imported whenever plugins load, CLI or not.
    import typer

    @cli.command("hello")
    def hello(
        name: str = typer.Argument("world", help="Who to greet."),
        greeting: str = typer.Option("Hello", "--greeting", "-g", help="The word to greet with."),
        times: int = typer.Option(1, "--times", "-n", min=1, help="How many times."),
    ) -> None:
        """Print greetings, exactly as the hello stage would write them."""
        for line in greetings(greeting, [name], times):
            typer.echo(line)
