"""A pool of worker processes sharing the jobs of one channel, and a producer that feeds it.

Run a broker, two or more worker processes (each hosting several instances), then the
producer::

    channelbus broker
    channelbus run examples.workers.worker:Worker --instances 4      # terminal 2
    channelbus run examples.workers.worker:Worker --instances 4      # terminal 3
    python -m examples.workers.producer --jobs 1000                  # terminal 4

The producer sends each job to the channel ``workers.jobs``; the broker gives each job to one
worker instance, which sends the result back to the producer's own channel. The producer checks
every result, and prints how many jobs each worker process did. Add ``--broker URL`` (or set
``CHANNELBUS_BROKER``) everywhere to use another broker.
"""

JOBS = "workers.jobs"
