from gql_service.cli.commands import main

main()
