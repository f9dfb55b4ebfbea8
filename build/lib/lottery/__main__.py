from lottery.cli import train

train()
