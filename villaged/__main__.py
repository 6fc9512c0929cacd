from villaged.cli import main

raise SystemExit(main())
