from sharp_unlearn.cli import main

raise SystemExit(main())
