from compress.cli import app

app(prog_name="compress")
