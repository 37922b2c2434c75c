from deepzoo.cli import main

raise SystemExit(main())
