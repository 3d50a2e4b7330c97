"""Rank, world size and rendezvous from SLURM's variables when srun (not torchrun) starts the tasks."""

from concept_train.trainer.distributed import _first_host, slurm_environment


def test_slurm_variables_become_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    out = slurm_environment(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_torchrun_or_a_single_task_wins():
    assert slurm_environment({"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == {}
    assert slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}


def test_first_host_of_a_nodelist():
    assert _first_host("node12") == "node12"
    assert _first_host("gpu[01-04,07],cpu3") == "gpu01"
    assert _first_host("a[3,5]") == "a3"
