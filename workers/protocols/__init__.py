"""visabus.workers.protocols: sans-IO protocol codecs (bytes in, events out) and thin client transports."""
