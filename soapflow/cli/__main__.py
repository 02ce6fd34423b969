from soapflow.cli.main import main

main()
