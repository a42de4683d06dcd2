"""univ: do independently trained networks learn the same features?"""

__version__ = "0.1.0"
