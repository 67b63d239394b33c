from multimodal_rwkv.cli import main

raise SystemExit(main())
