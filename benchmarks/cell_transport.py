"""NVFlare's cell transport alone: one server cell serves a model, one site cell downloads it, over mTLS.

What `benchmarks/exchange.py` measures is a whole FedAvg round (task hand-out, site, aggregation,
checkpoint); this isolates the part every byte goes through: two NVFlare cells (the kits' own
certificates, NVFlare's tcp driver) and FOBS's download service with fedllm's raw tensor views
(fedllm.flare.tensor_wire), the path a site's job and the server's job use when they talk directly
(server.job_ports). The baseline, measured in the same run with the same certificates: one mTLS
stream between two processes, no framework. The ratio says how much of the wire NVFlare's Python
stack leaves, and the CPU seconds per GiB say on which side it goes:
    .venv/bin/python benchmarks/cell_transport.py --size-mib 1024 --downloads 3
Last line: `cell transport 1GiB: X.XX GB/s = P% of mTLS (Y.YY GB/s); receiver R.R CPU-s/GiB, sender S.S CPU-s/GiB`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange import GB, loopback_mtls_gbps, provision_kits, size_label

SERVER_FQCN = "server"
SITE_FQCN = "site-1"


def _credentials(kit: Path, server: bool) -> dict[str, str]:
    from nvflare.fuel.f3.drivers.driver_params import DriverParams

    startup = kit / "startup"
    if server:
        return {
            DriverParams.CA_CERT.value: str(startup / "rootCA.pem"),
            DriverParams.SERVER_CERT.value: str(startup / "server.crt"),
            DriverParams.SERVER_KEY.value: str(startup / "server.key"),
        }
    return {
        DriverParams.CA_CERT.value: str(startup / "rootCA.pem"),
        DriverParams.CLIENT_CERT.value: str(startup / "client.crt"),
        DriverParams.CLIENT_KEY.value: str(startup / "client.key"),
    }


def serve(url: str, kit: str, identity: str, size_mib: float, downloads: int, chunk: int, refs) -> None:
    """Server cell process: registers `downloads` download transactions of the same weights, then waits."""
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.streaming.download_service import DownloadService

    from fedllm.flare.server_models import iter_weights
    from fedllm.flare.tensor_wire import TensorViewDownloadable

    cell = Cell(
        fqcn=SERVER_FQCN,
        root_url=url,
        secure=True,
        credentials=_credentials(Path(kit), server=True),
        create_internal_listener=False,
        auth_identity=identity,
    )
    cell.start()
    weights = dict(iter_weights(size_mib))
    for _ in range(downloads):
        tx = DownloadService.new_transaction(cell=cell, timeout=600, num_receivers=1)
        refs.put(DownloadService.add_object(tx, TensorViewDownloadable(weights, chunk)))
    time.sleep(3600)  # killed by the parent when it is done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--downloads", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=64, help="download chunk (fedllm's default: 64)")
    args = parser.parse_args()

    from nvflare.fuel.f3.cellnet.cell import Cell

    from fedllm.flare.tensor_wire import download_tensor_views

    with tempfile.TemporaryDirectory(prefix="fedllm-cellbench-") as tmp:
        kits = provision_kits(Path(tmp), sites=1)
        server_kit, site_kit = kits.server(), kits.site(kits.config.site_names[0])
        wire = max(loopback_mtls_gbps(server_kit, site_kit) for _ in range(3))
        print(f"one mTLS stream between two processes (kit certificates): {wire:.2f} GB/s", flush=True)

        url = f"tcp://{kits.config.server.name}:{kits.config.server.fed_learn_port}"
        mp = multiprocessing.get_context("spawn")
        refs = mp.Queue()
        server = mp.Process(
            target=serve,
            args=(
                url,
                str(server_kit),
                kits.config.server.name,
                args.size_mib,
                args.downloads,
                args.chunk_mib << 20,
                refs,
            ),
            daemon=True,
        )
        server.start()
        try:
            ids = [refs.get(timeout=300) for _ in range(args.downloads)]
            cell = Cell(
                fqcn=SITE_FQCN,
                root_url=url,
                secure=True,
                credentials=_credentials(site_kit, server=False),
                auth_identity=SITE_FQCN,
                auth_identity_map={SERVER_FQCN: kits.config.server.name, SITE_FQCN: SITE_FQCN},
            )
            cell.start()
            time.sleep(2)  # the cell registers with the server cell
            sender = psutil.Process(server.pid)
            rates, recv_cpu, send_cpu = [], [], []
            for ref in ids:
                s0, c0, t0 = sum(sender.cpu_times()[:2]), time.process_time(), time.perf_counter()
                err, tensors = download_tensor_views(
                    SERVER_FQCN, ref, cell, use_disk=False, root_dir=None, per_request_timeout=300
                )
                elapsed = time.perf_counter() - t0
                if err:
                    raise RuntimeError(f"download failed: {err}")
                gib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30
                rates.append(gib * 2**30 / elapsed / GB)
                recv_cpu.append((time.process_time() - c0) / gib)
                send_cpu.append((sum(sender.cpu_times()[:2]) - s0) / gib)
                print(
                    f"download {gib:.2f} GiB in {elapsed:.2f} s = {rates[-1]:.2f} GB/s; CPU-s per GiB: "
                    f"receiver {recv_cpu[-1]:.2f}, sender {send_cpu[-1]:.2f}",
                    flush=True,
                )
                del tensors
            cell.stop()
        finally:
            server.kill()
    best = max(range(len(rates)), key=rates.__getitem__)
    print(
        f"cell transport {size_label(args.size_mib)}: {rates[best]:.2f} GB/s = {rates[best] / wire:.0%} of mTLS "
        f"({wire:.2f} GB/s); receiver {recv_cpu[best]:.1f} CPU-s/GiB, sender {send_cpu[best]:.1f} CPU-s/GiB"
    )


if __name__ == "__main__":
    main()
