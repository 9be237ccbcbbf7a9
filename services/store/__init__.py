"""The store: places instances per institution policy, indexes them, announces them."""
