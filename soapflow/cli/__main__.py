from soapflow.cli.main import run

run()
