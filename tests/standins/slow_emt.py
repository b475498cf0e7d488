"""EMT that takes its time (`delay_s` per calculation), so a test can kill a worker while it
labels."""

import time

from ase.calculators.emt import EMT


class SlowEMT(EMT):
    default_parameters = {**EMT.default_parameters, "delay_s": 0.5}

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        time.sleep(self.parameters.delay_s)
        kwargs = {} if system_changes is None else {"system_changes": system_changes}
        super().calculate(atoms, properties, **kwargs)
