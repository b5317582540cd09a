import sys

from sandhop.datasets.webshop.app import make_server

server = make_server(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
print(f"serving the web shop on http://127.0.0.1:{server.server_address[1]}/ (its API answers as api.shop.test)")
server.serve_forever()
