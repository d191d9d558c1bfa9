from dynammo.cli import main

raise SystemExit(main())
