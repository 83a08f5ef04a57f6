"""The application (layer 5, on top of the loader): the `nearstore` command, the demo, converters
from what users have, and the training loop the demo and the benches share."""
