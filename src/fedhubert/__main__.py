from fedhubert.cli import main

raise SystemExit(main())
