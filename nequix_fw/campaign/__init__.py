"""One active-learning campaign as plain stage calls on a directory (no FireWorks here): its
log (`log`), its settings overlays and layout (`layout`), its stages (`stages`) and its report
(`report`).

Iteration 0 labels the initial structures, grows the dataset, trains the first ensemble (from
scratch or fine-tuned) and validates it. Iteration k >= 1 explores with the ensemble of k-1,
evaluates the candidates, selects the uncertain ones, labels them, grows the dataset, trains
ensemble k (each member warm-started from its predecessor) and validates it. Each stage writes
into the directory of its name (<stage>/<system>/ for a system's own part)::

    <directory>/campaign.json             one record per iteration (counts, metrics, decisions)
    <directory>/iter_<k>/explore/         candidates.extxyz + manifest.json
                         run_ensemble/    ensemble_results.json (+ .arrays.npz)
                         select/          the selected structures + manifest.json, selected.json
                         label/           <structure id>/ (inputs, outputs, task.json), summary.json
                         train_ensemble/  member_<i>.nqx (+ .json, _log.csv)
                         validate/        validation.json + plots
"""

from nequix_fw.campaign.layout import Campaign, member_files
from nequix_fw.campaign.log import CampaignLog
from nequix_fw.campaign.report import plot_progress

__all__ = ["Campaign", "CampaignLog", "member_files", "plot_progress"]
