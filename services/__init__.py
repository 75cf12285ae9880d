"""Domain services: async functions and small classes that take `session=` keyword-only; wings for subsystems."""
