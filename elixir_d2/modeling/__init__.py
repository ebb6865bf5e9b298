"""ElixirNet components; importing a module registers it with detectron2."""
