"""The local stack: API Gateway's WebSocket API, Lambda and DynamoDB on 127.0.0.1.

`python -m local` (what `make run` runs) starts it; `local.stack.running()` does
the same from Python. The modules, in the order a request meets them:

    __main__    the command line (serve, chat, token)
    server      starts and stops the parts in order
    gateway     the API Gateway emulator (aiohttp): upgrade, frames, timeouts,
                $disconnect, the @connections management API
    selection   route selection expressions
    sigv4       the management API's signature check
    events      the Lambda events API Gateway sends
    runtime     the Lambda: worker processes as execution environments
    dynamodb    moto's server, DynamoDB Local or an endpoint, and the table
    template    what template.json says (routes, environment, table)
    stack       the stack as a child process, for tests and benchmarks
    capacity    the gateway's capacity benchmark (make capacity)
    chat        a terminal chat client (make chat)
    tokens      private rooms: the room-token secret and `python -m local token`
"""
