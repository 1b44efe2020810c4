"""How instructions and updates travel: in-process (simulation), gRPC (coordinator + edge agent), Flower; the wire
format. A transport never knows which method runs; a method never knows which transport carries it."""
