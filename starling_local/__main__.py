from starling_local.cli import main

raise SystemExit(main())
