"""Use cases behind the routes: one function per action, each owning its transaction."""
