"""C declarations for the native libraries smol-kernel loads (read at run time by cffi)."""
