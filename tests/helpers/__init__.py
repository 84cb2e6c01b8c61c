"""Code shared by several test modules: tiny reference models, generated data, trainer runners."""
