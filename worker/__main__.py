import sys

try:
    from worker.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and the rest load: not 40 lines of their imports' traceback
    sys.exit(130)

sys.exit(main())
