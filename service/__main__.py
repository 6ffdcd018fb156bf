"""`python -m service`: serve the model over gRPC until SIGTERM or SIGINT."""

from service.server import main

if __name__ == "__main__":
    main()
