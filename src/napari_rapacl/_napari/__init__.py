"""napari glue: readers, writer, sample data and widgets. Thin: all compute lives in the package."""
