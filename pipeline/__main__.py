from pipeline.cli.main import main

# Guarded: receiving processes are started with "spawn", which imports this module again.
if __name__ == "__main__":
    main()
