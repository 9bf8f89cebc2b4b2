"""C++/CUDA sources of the engine extension; compiled on the user's machine by engine.extension."""
