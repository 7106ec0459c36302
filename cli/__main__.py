from apdkit.cli.main import app

app()
