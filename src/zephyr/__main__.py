from zephyr.cli import main

raise SystemExit(main())
