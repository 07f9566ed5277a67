from trulyopen.cli import app

app()
