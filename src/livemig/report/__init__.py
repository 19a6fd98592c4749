"""Reports of migrations: progress display, timelines as JSON, plots as PNG."""
