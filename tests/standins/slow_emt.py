"""EMT that takes its time (`delay_s` per calculation), so a test can kill a worker while it
labels; with `calls_log`, every calculation appends its structure's id to that file (a load
test counts the oracle's calls)."""

import os
import time

from ase.calculators.emt import EMT

from nequix_fw.structures import structure_id


class SlowEMT(EMT):
    default_parameters = {**EMT.default_parameters, "delay_s": 0.5, "calls_log": None}

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        time.sleep(self.parameters.delay_s)
        kwargs = {} if system_changes is None else {"system_changes": system_changes}
        super().calculate(atoms, properties, **kwargs)
        if self.parameters.calls_log:  # one short append: whole lines from concurrent workers
            fd = os.open(self.parameters.calls_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, (structure_id(self.atoms) + "\n").encode())
            os.close(fd)
