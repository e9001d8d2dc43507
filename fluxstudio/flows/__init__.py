"""Jobs end to end: a build, a preview, and the runner that holds one at a time."""
